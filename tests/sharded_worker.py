"""Runs `idjax.sharded` in a fresh process with several (fake CPU) devices; used by tests/test_sharded.py.

The device count must be fixed before jax starts, so the caller sets
XLA_FLAGS=--xla_force_host_platform_device_count=<devices> in this process's environment.

    python tests/sharded_worker.py devices --data x.npz --out out.npz --k 1,8,64 [--x64]
    python tests/sharded_worker.py multiprocess --data x.npz --out out.npz --k 8,64 \
        --process-id 0 --num-processes 2 --port 12345

`devices`: one process, every input path (host array, global jax.Array, ShardedRows), estimators and
overlaps on the sharded outputs. `multiprocess`: one of several processes joined by
`jax.distributed.initialize` on localhost; each process passes only its own chunk of rows (uneven
chunks) to `shard_rows`, or its half of a global array built with make_array_from_process_local_data.
Process 0 writes the gathered results.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def _estimates(prefix: str, dist: np.ndarray | object, idx, other_idx, labels, results: dict) -> None:
    import idjax

    results[f"{prefix}/twonn"] = float(idjax.twonn(dist, duplicates="drop"))
    results[f"{prefix}/gride"] = np.asarray(idjax.gride_scaling(dist, range_max=8, duplicates="drop").ids)
    results[f"{prefix}/label_overlap"] = idjax.label_overlap(idx, labels, 8)
    results[f"{prefix}/data_overlap"] = idjax.data_overlap(idx, other_idx, 8)


def run_devices(args, results: dict) -> None:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from idjax import sharded

    data = np.load(args.data)
    x, labels = data["x"], data["labels"]
    results["device_count"] = jax.device_count()
    mesh = sharded.default_mesh()
    for k in args.k:
        dist, idx = sharded.knn_sharded(x, k, block_size=args.block_size)
        results[f"host/{k}/distances"] = np.asarray(dist)
        results[f"host/{k}/indices"] = np.asarray(idx)
        results[f"host/{k}/spec"] = str(tuple(dist.sharding.spec))
    k = max(args.k)
    if "ties" in data:  # integer-valued points: many exact distance ties, decided by index
        dist, idx = sharded.knn_sharded(data["ties"], k, block_size=args.block_size)
        results["ties/distances"], results["ties/indices"] = np.asarray(dist), np.asarray(idx)
    # ShardedRows from one process's rows.
    dist, idx = sharded.knn_sharded(sharded.shard_rows(x), k, block_size=args.block_size)
    results["rows/distances"], results["rows/indices"] = np.asarray(dist), np.asarray(idx)
    if args.minimal:
        return
    # Estimators and overlaps straight on the (fully addressable) sharded outputs.
    dist, idx = sharded.knn_sharded(x, k, block_size=args.block_size)
    other = sharded.knn_sharded(data["y"], k, block_size=args.block_size).indices
    _estimates("sharded", dist, idx, other, labels, results)
    results["other/indices"] = np.asarray(other)
    # A global jax.Array input, sharded by rows (N cut to a multiple of the device count).
    n_even = x.shape[0] // jax.device_count() * jax.device_count()
    x_global = jax.device_put(x[:n_even], NamedSharding(mesh, P("data", None)))
    dist, idx = sharded.knn_sharded(x_global, k)
    results["global/distances"], results["global/indices"] = np.asarray(dist), np.asarray(idx)
    results["global/spec"] = str(tuple(dist.sharding.spec))


def run_multiprocess(args, results: dict) -> None:
    import jax

    # Cross-process collectives on CPU go through gloo over TCP (jax 0.10's default; set explicitly).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=60)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from idjax import sharded

    data = np.load(args.data)
    x, labels = data["x"], data["labels"]
    process, count = jax.process_index(), jax.process_count()
    results["device_count"] = jax.device_count()
    results["local_device_count"] = jax.local_device_count()
    # Uneven chunks: process p holds rows [cuts[p], cuts[p + 1]), the first process a few more.
    cuts = [0] + [(p + 1) * x.shape[0] // count + (7 if p + 1 < count else 0) for p in range(count)]
    rows = sharded.shard_rows(x[cuts[process]: cuts[process + 1]])
    assert rows.points.is_fully_addressable is False
    for k in args.k:
        nbrs = sharded.knn_sharded(rows, k)
        dist, idx = sharded.gather_to_host(nbrs)
        results[f"rows/{k}/distances"], results[f"rows/{k}/indices"] = dist, idx
    k = max(args.k)
    # The estimators run on gathered results on every process.
    dist, idx = sharded.gather_to_host(sharded.knn_sharded(rows, k))
    other = sharded.gather_to_host(sharded.knn_sharded(data["y"], k).indices)  # a host array, same on all
    _estimates("gathered", dist, idx, other, labels, results)
    results["other/indices"] = other
    # A global array assembled from each process's half with make_array_from_process_local_data.
    n_even = x.shape[0] // jax.device_count() * jax.device_count()
    lo, hi = sharded.process_row_range(n_even)
    x_global = jax.make_array_from_process_local_data(
        NamedSharding(sharded.default_mesh(), P("data", None)), x[lo:hi], (n_even, x.shape[1]))
    dist, idx = sharded.gather_to_host(sharded.knn_sharded(x_global, k))
    results["global/distances"], results["global/indices"] = dist, idx


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["devices", "multiprocess"])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--k", type=lambda s: [int(v) for v in s.split(",")], default=[8])
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--x64", action="store_true")
    parser.add_argument("--minimal", action="store_true", help="devices: host, ShardedRows and ties inputs only")
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)

    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    results: dict = {}
    if args.mode == "devices":
        run_devices(args, results)
    else:
        run_multiprocess(args, results)
    if jax.process_index() == 0:
        np.savez(args.out, **results)
    if args.mode == "multiprocess":
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
