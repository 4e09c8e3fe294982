"""JAX's multi-process runtime for the pipeline: start, topology, the writer process, barriers, the mesh.

One process (the default) needs none of this: `initialize` is then a no-op, `is_writer()` is True and
`barrier` returns at once. Several processes (hosts, or processes on one host) are joined by
`jax.distributed.initialize`; every device of every process then forms one `Mesh` with axes
("data", "model"), and process 0 writes the files that all processes share.
"""

from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


class Topology(NamedTuple):
    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    platform: str


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def _cluster_detected() -> bool:
    """A multi-process launcher whose environment JAX can read by itself (SLURM with several tasks, TPU pods)."""
    slurm_tasks = _env_int("SLURM_NTASKS")
    return (slurm_tasks is not None and slurm_tasks > 1) or "TPU_WORKER_HOSTNAMES" in os.environ


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> Topology:
    """Joins this process to a multi-process job when asked, logs the topology and returns it.

    Asked means: the arguments, else the environment variables IDJAX_COORDINATOR_ADDRESS /
    IDJAX_NUM_PROCESSES / IDJAX_PROCESS_ID, else a cluster JAX detects itself (SLURM, TPU pods).
    Otherwise (one process) nothing is started. Calling it again is a no-op.
    """
    if not jax.distributed.is_initialized():
        address = coordinator_address or os.environ.get("IDJAX_COORDINATOR_ADDRESS") or None
        count = num_processes if num_processes is not None else _env_int("IDJAX_NUM_PROCESSES")
        index = process_id if process_id is not None else _env_int("IDJAX_PROCESS_ID")
        if address is not None or count is not None or index is not None:
            if address is None or count is None or index is None:
                raise ValueError("a multi-process start needs all of coordinator_address, num_processes and process_id "
                                 f"(got {address!r}, {count!r}, {index!r}); pass the three launch flags or set "
                                 "IDJAX_COORDINATOR_ADDRESS, IDJAX_NUM_PROCESSES and IDJAX_PROCESS_ID")
            if count > 1:
                jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)
        elif _cluster_detected():
            jax.distributed.initialize()
    topo = topology()
    logging.info("JAX topology: process %d of %d, %d local / %d global %s devices", topo.process_index,
                 topo.process_count, topo.local_device_count, topo.device_count, topo.platform)
    return topo


def topology() -> Topology:
    """This process's place in the job and the devices it sees."""
    return Topology(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                    jax.devices()[0].platform)


def is_writer() -> bool:
    """Whether this process writes the files all processes share (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name`; returns at once in a single process."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def make_mesh(model_parallel: int = 1) -> Mesh:
    """Every device of every process, axes ("data", "model") of shape (device_count // model_parallel,
    model_parallel). Each process's devices are consecutive, so a process holds whole "data" rows when
    model_parallel divides its local device count."""
    devices = jax.devices()
    if model_parallel < 1 or len(devices) % model_parallel:
        raise ValueError(f"model_parallel={model_parallel} must be a positive divisor of the device count "
                         f"{len(devices)}")
    return Mesh(np.asarray(devices).reshape(len(devices) // model_parallel, model_parallel), ("data", "model"))


def param_shardings(params: Any, mesh: Mesh, fsdp: bool) -> Any:
    """A NamedSharding per leaf: replicated (P()) unless `fsdp`, where each leaf's largest axis that the
    "model" axis size divides is sharded over "model" (leaves with no such axis stay replicated)."""
    model_size = mesh.shape["model"]

    def leaf_sharding(leaf) -> NamedSharding:
        shape = tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)
        if not fsdp:
            return NamedSharding(mesh, P())
        candidates = [axis for axis in range(len(shape)) if shape[axis] % model_size == 0]
        if not candidates:
            return NamedSharding(mesh, P())
        axis = max(candidates, key=lambda a: (shape[a], -a))
        return NamedSharding(mesh, P(*([None] * axis + ["model"])))

    return jax.tree.map(leaf_sharding, params)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """The leading (batch) axis over "data", the other `ndim - 1` axes replicated."""
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))
