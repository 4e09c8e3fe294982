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

Failures end the whole job, promptly, with the reason on every process. Left to JAX alone, a process
that raises runs JAX's graceful shutdown at exit, a barrier that waits (up to 300 s) for peers which are
themselves blocked in a collective or barrier waiting for it; a killed process is noticed only when its
heartbeats stop (100 s). Here, with several processes:
  * an uncaught exception (and launch.py's reported errors) goes to `fail_job`: the process records
    "process i failed: <error>" in the coordination service's key-value store, prints it, and exits 1
    at once without the shutdown barrier (process 0, which hosts the service, first waits up to
    `ACK_SECONDS` for the others to read the record);
  * every process runs a watcher thread that reads those records every `POLL_SECONDS`: on another
    process's failure it prints "stopping process j: process i failed: <error>" and exits
    `PEER_FAILED_EXIT_CODE` (3);
  * a process killed outright (SIGKILL, OOM killer, lost host) writes nothing. A peer in a collective with
    it whose transport notices the closed connection (gloo on CPU, within seconds) gets an error naming
    the broken connection: it exits `PEER_FAILED_EXIT_CODE` saying that another process was lost, and the
    others follow through their watchers. A peer that is not told (a frozen host, or a transport that
    waits) stays blocked until JAX's heartbeat check ends it after `heartbeat` seconds, naming the task
    that stopped sending heartbeats; a lost process 0 ends the others at once. Those two endings are
    JAX's own fatal errors: exit status 134 (SIGABRT) with a native stack dump;
  * `barrier` is the coordination service's barrier with a timeout; when it expires the error names
    the processes that did not arrive.
Stores and other results are safe either way: every file is written atomically and a store is complete
only once its manifest, written last, exists, so a rerun resumes.

Knobs (`Timeouts`, seconds; launch flags `--<name>_timeout_seconds`, else IDJAX_<NAME>_TIMEOUT_SECONDS,
else the default): initialization (how long process startup waits for every process to join; 300),
heartbeat (a silent process is declared dead after this; 30, JAX's default is 100), barrier (longest wait
at a `barrier`, e.g. while process 0 writes a large store's layers; 3600), shutdown (the graceful shutdown
barrier after a successful run; 300).
"""

from __future__ import annotations

import logging as std_logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

ENV_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "IDJAX_COORDINATOR_ADDRESS", "IDJAX_NUM_PROCESSES", "IDJAX_PROCESS_ID"
DATA_AXIS, MODEL_AXIS = "data", "model"
FAILED_EXIT_CODE = 1  # this process failed
PEER_FAILED_EXIT_CODE = 3  # this process was stopped because another process of the job failed or was lost
POLL_SECONDS = 0.5  # how often the watcher reads the failure records
# Errors of a collective whose other side vanished (gloo on CPU notices a killed peer's closed socket at once):
LOST_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
ACK_SECONDS = 5.0  # how long a failing process 0 keeps the coordination service up for the others to read why
_FAILED_KEY, _SEEN_KEY, _ARRIVED_KEY = "idjax/failed/", "idjax/seen/", "idjax/arrived/"


class Timeouts(NamedTuple):
    """Seconds (see the module docstring): joining at startup, declaring a silent process dead, waiting at a
    `barrier`, and the graceful shutdown barrier after success."""

    initialization: int = 300
    heartbeat: int = 30
    barrier: int = 3600
    shutdown: int = 300


def timeout_env(name: str) -> str:
    """The environment variable of a `Timeouts` field: IDJAX_HEARTBEAT_TIMEOUT_SECONDS for "heartbeat"."""
    return f"IDJAX_{name.upper()}_TIMEOUT_SECONDS"


class _Job:
    """This process's part of a multi-process job (set by `initialize`)."""

    started = False  # jax.distributed has been started here (initialize is idempotent)
    timeouts = Timeouts()
    barrier_calls: dict[str, int] = {}  # name -> calls so far: every process calls barriers in the same order
    stop_watching = threading.Event()
    previous_hook = staticmethod(sys.excepthook)
    failing = threading.Lock()  # one failure report per process, whichever thread gets there first


class BarrierError(RuntimeError):
    """A `barrier` timed out or failed; the message names the processes that did not arrive."""


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


def timeouts(**given: int | None) -> Timeouts:
    """`Timeouts` from the given values (None: not given), else IDJAX_<NAME>_TIMEOUT_SECONDS, else the defaults."""
    values = {}
    for name, default in Timeouts._field_defaults.items():
        value = _from_env(timeout_env(name), given.get(name), int)
        value = default if value is None else int(value)
        if value < 1:
            raise ValueError(f"{name} timeout of {value} s must be at least 1 s (--{name}_timeout_seconds or "
                             f"{timeout_env(name)})")
        values[name] = value
    return Timeouts(**values)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, **timeout_seconds: int | None) -> Topology:
    """Joins this process to a multi-process job when one is asked for or detected; logs and returns the topology.

    Arguments win over the IDJAX_* environment variables; without either, `jax.distributed.initialize()`
    runs only on a detected cluster (SLURM with several tasks, a multi-host TPU slice). Calling it again
    is a no-op. One process with no request: nothing is started. `timeout_seconds`: `Timeouts` fields
    (initialization=, heartbeat=, barrier=, shutdown=); with several processes the fail-fast handlers of
    the module docstring are installed.
    """
    address = _from_env(ENV_ADDRESS, coordinator_address, str)
    count = _from_env(ENV_NUM_PROCESSES, num_processes, int)
    index = _from_env(ENV_PROCESS_ID, process_id, int)
    unknown = sorted(set(timeout_seconds) - set(Timeouts._fields))
    if unknown:
        raise TypeError(f"initialize: unknown timeouts {unknown}; one of {Timeouts._fields}")
    limits = timeouts(**timeout_seconds)
    asked = any(v is not None for v in (address, count, index))
    if not _Job.started and (asked or _cluster_detected()):
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
            jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index,
                                       initialization_timeout=limits.initialization,
                                       heartbeat_timeout_seconds=limits.heartbeat,
                                       shutdown_timeout_seconds=limits.shutdown)
        _Job.started, _Job.timeouts = True, limits
        if jax.process_count() > 1:
            _install_fail_fast(address)
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


# ---------------------------------------------------------------------------------------------------
# Barriers and failing fast (see the module docstring)


def _client() -> Any:
    """JAX's coordination-service client of this process (None before `jax.distributed.initialize`)."""
    from jax._src import distributed as jax_distributed  # the client has no public accessor

    return jax_distributed.global_state.client


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (no-op for one process), at most the barrier timeout.

    Raises:
      BarrierError naming the processes that did not arrive (hung, still working, or failed) and the knob.
    """
    if jax.process_count() == 1:
        return
    client, me, count = _client(), jax.process_index(), jax.process_count()
    # Every process calls its barriers in the same order, so the n-th call of a name is the same barrier.
    occurrence = _Job.barrier_calls[name] = _Job.barrier_calls.get(name, -1) + 1
    key = f"{name}/{occurrence}"
    client.key_value_set(f"{_ARRIVED_KEY}{key}/{me}", socket.gethostname())
    seconds = _Job.timeouts.barrier
    try:
        client.wait_at_barrier(f"idjax/{key}", seconds * 1000)
    except jax.errors.JaxRuntimeError as err:
        try:
            arrived = {int(k.rsplit("/", 1)[-1]) for k, _ in client.key_value_dir_get(f"{_ARRIVED_KEY}{key}/")}
            missing = ", ".join(str(p) for p in range(count) if p not in arrived) or "none"
        except jax.errors.JaxRuntimeError:
            missing = "unknown (the coordination service cannot be reached)"
        raise BarrierError(
            f"barrier {name!r} failed after waiting up to {seconds} s; processes that did not arrive: {missing} (hung, "
            "failed, or still working: see their logs; a legitimately slow step needs a larger "
            f"--barrier_timeout_seconds or {timeout_env('barrier')}). JAX: {' '.join(str(err).split())[:400]}"
        ) from err


def share_from_writer(key: str, produce: Callable[[], str]) -> str:
    """`produce()` computed on process 0 only, and the same string returned on every process.

    It goes through the coordination service's key-value store, not a JAX collective, so it may run while a
    function is being traced (e.g. a choice that decides which program to compile, which every process must
    make alike). One process: `produce()`. Every process must ask for each `key` (once per process; a second
    call with the same key returns process 0's first value).

    Raises:
      BarrierError when process 0 has not published the value within the barrier timeout.
    """
    if jax.process_count() == 1:
        return produce()
    client, name = _client(), f"idjax/shared/{key}"
    if is_writer():
        try:
            return client.key_value_try_get(name)
        except jax.errors.JaxRuntimeError:  # not published yet: the usual case
            value = produce()
            client.key_value_set(name, value)
            return value
    seconds = _Job.timeouts.barrier
    try:
        return client.blocking_key_value_get(name, seconds * 1000)
    except jax.errors.JaxRuntimeError as err:
        raise BarrierError(f"process 0 did not publish {key!r} within {seconds} s (hung, failed, or still working: "
                           f"see its log; raise --barrier_timeout_seconds or {timeout_env('barrier')}). "
                           f"JAX: {' '.join(str(err).split())[:300]}") from err


def _failures(client: Any) -> dict[int, str]:
    """The failure records of the job: process index -> its message."""
    return {int(key.rsplit("/", 1)[-1]): value for key, value in client.key_value_dir_get(_FAILED_KEY)}


def _exit_now(message: str | None, code: int) -> None:
    """Prints `error: message` and ends this process at once: no atexit handlers, so no JAX shutdown barrier."""
    for handler in std_logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    if message:  # on a line of its own, after a progress bar's unfinished one
        print(f"\nerror: {message}", file=sys.stderr, flush=True)
    sys.stderr.flush()
    os._exit(code)


def _stop_for_peer(client: Any, me: int, failures: dict[int, str]) -> None:
    """Another process failed: acknowledge (its process 0 waits for that), say who and why, exit."""
    try:
        client.key_value_set(f"{_SEEN_KEY}{me}", "")
    except jax.errors.JaxRuntimeError:
        pass
    first = min(failures)
    _exit_now(f"stopping process {me}: process {first} of the job failed: {failures[first]}", PEER_FAILED_EXIT_CODE)


def fail_job(message: str) -> None:
    """Ends a multi-process job because this process failed with `message`; returns at once for one process.

    Records the failure for the other processes (their watchers stop them within `POLL_SECONDS`), prints
    it, and exits `FAILED_EXIT_CODE` without JAX's graceful shutdown barrier, which would wait for peers
    blocked in a collective with this process. If another process had already failed (this one's error is
    then usually the broken collective), that one is reported instead and this exits `PEER_FAILED_EXIT_CODE`.
    Process 0 hosts the coordination service: it waits up to `ACK_SECONDS` for the others to read the record.
    """
    client = _client()
    if client is None or not _Job.started or jax.process_count() == 1:
        return
    _Job.failing.acquire()  # the watcher thread, or a second failure, stops here; this thread exits below
    _Job.stop_watching.set()
    me, count = jax.process_index(), jax.process_count()
    text = " ".join(str(message).split())[:1000]
    try:
        earlier = {p: why for p, why in _failures(client).items() if p != me}
        if earlier:
            _stop_for_peer(client, me, earlier)
        if any(sign in text for sign in LOST_PEER_SIGNS):  # a peer vanished mid-collective: not this process's fault
            _exit_now(f"stopping process {me} of {count}: a collective with another process of the job broke (that "
                      f"process was killed or its host lost; its log says why): {text}", PEER_FAILED_EXIT_CODE)
        client.key_value_set(f"{_FAILED_KEY}{me}", f"{text} (host {socket.gethostname()}, pid {os.getpid()})")
    except jax.errors.JaxRuntimeError as err:  # the service (process 0) is gone: say so, exit all the same
        _exit_now(f"process {me} of {count} failed: {text}; the job's coordinator (process 0) cannot be reached "
                  f"to tell the others ({' '.join(str(err).split())[:200]})", FAILED_EXIT_CODE)
    print(f"\nerror: process {me} of {count} failed: {text}; telling the other processes to stop", file=sys.stderr,
          flush=True)
    if me == 0:
        deadline = time.monotonic() + ACK_SECONDS
        while time.monotonic() < deadline:
            try:
                if len(client.key_value_dir_get(_SEEN_KEY)) >= count - 1:
                    break
            except jax.errors.JaxRuntimeError:
                break
            time.sleep(0.1)
    _exit_now(None, FAILED_EXIT_CODE)


def _watch(client: Any, me: int) -> None:
    """The watcher thread: stops this process when another one has recorded its failure."""
    # It keeps watching through JAX's shutdown barrier at exit (a peer may still fail) and ends with the
    # client. A lost coordinator needs no watching: JAX ends every other process at once itself.
    while not _Job.stop_watching.wait(POLL_SECONDS) and _client() is client:
        try:
            failures = {p: why for p, why in _failures(client).items() if p != me}
        except jax.errors.JaxRuntimeError:
            continue
        if failures and not _Job.stop_watching.is_set():
            with _Job.failing:
                _stop_for_peer(client, me, failures)


def _excepthook(kind: type[BaseException], value: BaseException, trace: Any) -> None:
    _Job.previous_hook(kind, value, trace)  # the traceback, as without this hook
    fail_job(f"{kind.__name__}: {value}")


def _install_fail_fast(address: str | None) -> None:
    """Starts the watcher and routes uncaught exceptions to `fail_job` (several processes only)."""
    _Job.previous_hook, sys.excepthook = sys.excepthook, _excepthook
    threading.Thread(target=_watch, args=(_client(), jax.process_index()), name="idjax-job-watcher",
                     daemon=True).start()
    logging.info("fail-fast: watching the job's failure records at %s every %g s; %s", address, POLL_SECONDS,
                 _Job.timeouts)


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
