"""Runs sharded training in a fresh process with several (fake CPU) devices; used by
tests/test_distributed_train.py.

The device count must be fixed before jax starts, so the caller sets
XLA_FLAGS=--xla_force_host_platform_device_count=<devices> in this process's environment.

    python tests/distributed_train_worker.py step --out out.npz
    python tests/distributed_train_worker.py train --workdir W --out out.npz [--crash-at 6] [--model-parallel 2] \
        [--process-id 0 --num-processes 2 --port 12345]

`step`: one training step from the same state and batch on a 1-device mesh, data-parallel over 8 devices,
FSDP over a (4, 2) mesh, and plainly jitted without a mesh; writes every layout's new state and metrics.
`train`: `train.train` on `small_config`, optionally crashed (an exception from `on_step`) at a step and
resumed; process 0 writes the final checkpoint's state (gathered) and every process writes the paths it
opened for writing in the workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import numpy as np

STEPS, CHECKPOINT_EVERY = 12, 4


def small_config(model_parallel: int = 1, fsdp: bool = False):
    """A tiny iGPT on scikit-learn's digits (bundled, always available), checkpointed every 4 of 12 steps."""
    from configs import train_igpt_tiny

    c = train_igpt_tiny.get_config()
    c.model.num_layers, c.model.embed_dim, c.model.num_heads = 2, 32, 2
    c.data.max_eval_examples = 64
    c.train.steps, c.train.batch_size, c.train.eval_batch_size = STEPS, 16, 32
    c.train.learning_rate, c.train.warmup_steps = 3e-3, 2
    # Adam's update is lr * m / (sqrt(v) + eps): a gradient rounded differently by delta (another summation
    # order over devices or processes) moves a param by up to about lr * delta / eps. With eps = 1e-3 that stays
    # near float32 rounding; with 1e-8 a gradient entry near 1e-8 turns rounding noise into a visible change.
    c.train.eps = 1e-3
    c.train.log_interval, c.train.eval_interval = 2, CHECKPOINT_EVERY
    c.train.progress_bar = False
    c.train.model_parallel, c.train.fsdp = model_parallel, fsdp
    c.checkpoint.interval = CHECKPOINT_EVERY
    c.checkpoint.async_save = False
    return c


def _flat(prefix: str, tree, results: dict) -> None:
    import jax

    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        results[f"{prefix}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)


def run_step(args, results: dict) -> None:
    import jax
    from jax.sharding import Mesh

    from experiments import train, train_data

    config = small_config()
    config.train.warmup_steps = 0  # the first step at the full learning rate, so the params move
    data, _ = train_data.load_data("images", config.data, None)
    model_config = train.make_model_config(config, data)
    batch = next(train_data.BatchIterator(data, config.train.batch_size, config.seed))
    train_json = config.train.to_json(sort_keys=True)
    devices = np.asarray(jax.devices())
    layouts = {"single": (devices[:1].reshape(1, 1), False), "data8": (devices.reshape(8, 1), False),
               "fsdp4x2": (devices.reshape(4, 2), True)}
    for name, (grid, fsdp) in layouts.items():
        mesh = Mesh(grid, ("data", "model"))
        optimizer, train_step, _, _, shardings = train._step_functions(model_config, train_json, mesh, fsdp)
        state = train.to_mesh(train.init_state(model_config, optimizer, config.seed), shardings)
        new_state, metrics = train_step(state, train.global_batch(batch, train.distributed.batch_sharding(mesh, 2)))
        # How many parameter leaves are really split (a device holds less than the whole leaf).
        results[f"{name}/moved_leaves"] = sum(not np.array_equal(before, after) for before, after in zip(
            jax.tree.leaves(jax.device_get(state["params"])), jax.tree.leaves(jax.device_get(new_state["params"])),
            strict=True))
        results[f"{name}/split_leaves"] = sum(leaf.addressable_shards[0].data.size < leaf.size
                                              for leaf in jax.tree.leaves(new_state["params"]))
        _flat(f"{name}/state", jax.device_get(new_state), results)
        _flat(f"{name}/metrics", jax.device_get(metrics), results)
    # The step as it was before meshes: plain jit on the default device, no shardings.
    optimizer, train_loss = train.make_optimizer(config.train), train.make_loss_fns(model_config, config.train)[0]
    new_state, metrics = jax.jit(train.make_train_step(train_loss, optimizer))(
        train.init_state(model_config, optimizer, config.seed), batch)
    _flat("plain/state", jax.device_get(new_state), results)
    _flat("plain/metrics", jax.device_get(metrics), results)


def _record_writes(workdir: pathlib.Path, written: set[str]) -> None:
    """Every path under `workdir` this process opens for writing or creates (Python-level I/O: json, numpy,
    matplotlib, TensorBoard, atomic writes), through the interpreter's audit hooks."""
    root = str(workdir.absolute())
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def hook(event: str, hook_args: tuple) -> None:
        if event not in ("open", "os.mkdir", "os.rename", "os.replace") or not hook_args:
            return
        path = hook_args[1] if event in ("os.rename", "os.replace") else hook_args[0]
        if not isinstance(path, (str, os.PathLike)):
            return
        path = os.path.abspath(os.fspath(path))
        if not path.startswith(root):
            return
        if event == "open":
            mode, flags = hook_args[1], hook_args[2]
            if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or
                    (mode is None and isinstance(flags, int) and flags & write_flags)):
                return
        written.add(os.path.relpath(path, root))

    sys.addaudithook(hook)


def run_train(args, results: dict) -> None:
    import jax

    from experiments import distributed, train, train_data

    if args.num_processes > 1:
        # Cross-process collectives on CPU go through gloo over TCP.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)
    workdir = pathlib.Path(args.workdir)
    written: set[str] = set()
    _record_writes(workdir, written)
    config = small_config(args.model_parallel, args.model_parallel > 1)

    class Crash(Exception):
        pass

    def crash(step: int) -> None:
        if step == args.crash_at:
            raise Crash

    if args.crash_at:
        try:
            train.train(config, workdir, on_step=crash)
            raise AssertionError("the run did not crash")
        except Crash:
            pass
        results["checkpoints_after_crash"] = np.asarray(sorted(
            int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()))
    result = train.train(config, workdir)
    results["resumed_from"] = -1 if result["resumed_from"] is None else result["resumed_from"]
    results["final_step"] = result["final_step"]
    # The final checkpoint, restored into the mesh's shardings (digest checked), gathered to the host.
    mesh, fsdp = train.training_mesh(config.train)
    optimizer = train.make_optimizer(config.train)
    model_config = train.make_model_config(config, train_data.load_data("images", config.data, workdir)[0])
    template = jax.eval_shape(lambda: train.init_state(model_config, optimizer, 0))
    shardings = train.state_shardings(template, mesh, fsdp)
    template = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), template, shardings)
    mngr = train._manager(workdir, config.checkpoint)
    state, _ = train._restore(mngr, STEPS, template)
    mngr.close()
    results["split_leaves"] = sum(leaf.addressable_shards[0].data.size < leaf.size
                                  for leaf in jax.tree.leaves(state["params"]))
    _flat("state", jax.tree.map(train.host_copy, state), results)
    pathlib.Path(f"{args.out}.writes{jax.process_index()}.json").write_text(json.dumps(sorted(written)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["step", "train"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir")
    parser.add_argument("--crash-at", type=int, default=0)
    parser.add_argument("--model-parallel", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)

    import jax

    results: dict = {}
    if args.mode == "step":
        run_step(args, results)
    else:
        run_train(args, results)
    if jax.process_index() == 0:
        np.savez(args.out, **results)
    if args.num_processes > 1:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
