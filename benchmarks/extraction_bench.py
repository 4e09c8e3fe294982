"""Extraction throughput of a small ESM-2 on 1, 2, 4, 8 devices, and the cost of the sharded path on one device;
with --memory, the extraction memory planner against XLA's own accounting of the compiled extraction.

    .venv/bin/python benchmarks/extraction_bench.py [--devices 1,2,4,8] [--n 384] [--batch-size 32] [--repeats 3]
        [--platform cpu|gpu|tpu] [--size tiny|8M|35M|150M|650M|...] [--lengths 8,28]
    .venv/bin/python benchmarks/extraction_bench.py --memory [--shapes esm2:8M:16:256,bert:minilm:32:128]

Every row runs `experiments.extract.run` in its own subprocess (tests/extract_worker.py; the fake CPU device
count, XLA_FLAGS=--xla_force_host_platform_device_count=P, is fixed when jax starts): the tiny random ESM-2
(2 layers, width 64) on `--n` seeded random proteins, global batch `--batch-size` sharded over "data".
Each subprocess first extracts the same data into a throwaway workdir (model built, every padded width
compiled), then times `--repeats` fresh extractions and keeps the best: examples/s of the stored result,
batch files, layer files and manifest included. Row "1 (plain)" is the single-device path without the mesh
(`extract.sharding=never`); "overhead" compares the sharded path on 1 device with it (target: within 10%).

Fake CPU devices share this machine's cores, so the rows show the cost of the sharded path, not a
speed-up; on a GPU/TPU host each device computes its own share of the batch: `--platform gpu` runs row P on
the host's first P GPUs (CUDA_VISIBLE_DEVICES=0..P-1, no fake devices), `--platform tpu` on all the host's
chips (a TPU host cannot be cut per process here, so `--devices` must be its chip count; another count is
refused). There a realistic model and length make sense: e.g. `--size 650M --lengths 100,500 --n 8192
--batch-size 256`.

--memory: for each family:size:batch:seq_len, the family's real pooled-extraction function (its public
`pooled_hidden_states`, float32, params given as shapes only) is compiled for this machine's default device
and `compiled.memory_analysis()` gives XLA's bytes: arguments (params + token arrays), temporaries (after
buffer reuse) and outputs. Beside them, `extract.plan_extraction`'s estimate for the same batch: the param
bytes + batch x `extract.example_bytes`. On a GPU/TPU the function also runs once and the device's
`peak_bytes_in_use` is printed (CPU devices keep no peak).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "extract_worker.py"
# family:size:batch:seq_len of the --memory table: published sizes that compile in seconds on a CPU, at batches
# a device would run.
MEMORY_SHAPES = ("esm2:8M:16:256,esm2:8M:4:1024,esm2:35M:8:512,esm2:150M:4:512,esm2:650M:2:1024,"
                 "igpt:s:8:1024,igpt:m:2:1024,bert:minilm:32:128,bert:minilm:8:512")


def row_environment(platform: str, devices: int, base: dict[str, str]) -> dict[str, str]:
    """The environment of the subprocess that times `devices` devices: P fake CPU devices, the first P GPUs, or
    (TPU) the host's chips as they are."""
    env = dict(base, PYTHONPATH=f"{REPO}{os.pathsep}{base.get('PYTHONPATH', '')}")
    if platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    elif platform == "gpu":
        env["JAX_PLATFORMS"] = "cuda"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(devices))
    elif platform == "tpu":
        env["JAX_PLATFORMS"] = "tpu"
    else:
        raise ValueError(f"--platform {platform!r}: expected cpu, gpu or tpu")
    return env


def run_one(devices: int, sharding: str, n: int, batch_size: int, repeats: int, scratch: pathlib.Path,
            platform: str = "cpu", size: str = "tiny", lengths: str = "8,28") -> dict:
    env = row_environment(platform, devices, dict(os.environ))
    tag = f"d{devices}_{sharding}"
    timing = scratch / f"{tag}.json"
    proc = subprocess.run([sys.executable, str(WORKER), "--family", "esm2", "--workdir", str(scratch / tag),
                           "--n", str(n), "--batch-size", str(batch_size), "--sharding", sharding,
                           "--timing", str(timing), "--repeats", str(repeats), "--size", size, "--lengths", lengths,
                           "--expect-devices", str(0 if platform == "cpu" or sharding == "never" else devices)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"{tag} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(timing.read_text())


def family_extraction(family: str, size: str, batch: int, seq_len: int, attention: str = "heads_major"
                      ) -> tuple[Any, Any, Any, tuple]:
    """(config, params as shapes, the jitted pooled-extraction function, its abstract inputs) of a family at one
    batch shape: the function the family's extraction encoder calls, in float32."""
    import jax
    import jax.numpy as jnp

    from models import bert, esm2, igpt

    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    if family == "esm2":
        config = esm2.get_config(size).replace(attention_impl=attention)  # "auto" would time the candidates
        model = esm2.ESM2(config)
        return config, esm2.param_shapes(config), jax.jit(lambda p, t: esm2.pooled_hidden_states(model, p, t)), \
            (tokens,)
    if family == "igpt":
        config = igpt.get_config(size, n_positions=max(seq_len, 1024))
        model = igpt.IGPT(config)
        return config, igpt.param_shapes(config), jax.jit(lambda p, t: igpt.pooled_hidden_states(model, p, t)), \
            (tokens,)
    if family == "bert":
        config = bert.get_config(size, max_position_embeddings=max(seq_len, 512))
        model = bert.Bert(config)
        return config, bert.param_shapes(config), \
            jax.jit(lambda p, t, m: bert.pooled_hidden_states(model, p, t, m)), (tokens, tokens)
    raise ValueError(f"unknown family {family!r}: esm2, igpt or bert")


def planner_vs_xla(family: str, size: str, batch: int, seq_len: int, attention: str = "heads_major") -> dict:
    """The planner's bytes for one batch of `batch` x `seq_len` tokens beside XLA's for the compiled function:
    planner_params, planner_activations (batch x example_bytes), xla_arguments, xla_temp, xla_output, and peak
    (the device's peak bytes in use after one run on a GPU/TPU; None on CPU)."""
    import jax
    import numpy as np

    from experiments import extract

    config, params, fn, inputs = family_extraction(family, size, batch, seq_len, attention)
    param_bytes = sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(params))
    per_example = extract.example_bytes(seq_len, dtype_bytes=4, **extract.model_dims(config))
    compiled = fn.lower(params, *inputs).compile()
    stats = compiled.memory_analysis()
    peak = None
    if jax.devices()[0].platform != "cpu":
        concrete = jax.tree_util.tree_map(lambda s: jax.numpy.zeros(s.shape, s.dtype), params)
        jax.block_until_ready(compiled(concrete, *(jax.numpy.ones(s.shape, s.dtype) for s in inputs)))
        peak = jax.devices()[0].memory_stats().get("peak_bytes_in_use")
    return {"planner_params": param_bytes, "planner_activations": batch * per_example,
            "xla_arguments": int(stats.argument_size_in_bytes), "xla_temp": int(stats.temp_size_in_bytes),
            "xla_output": int(stats.output_size_in_bytes), "peak": peak}


def memory_table(shapes: str) -> None:
    import jax

    device = jax.devices()[0]
    print(f"XLA on {device.platform} ({device.device_kind}), float32, MB = 10^6 bytes\n")
    print("| family | size | batch x tokens | planner: params + activations (MB) | XLA: arguments + temp + output (MB) "
          "| planner / XLA | activations: planner / XLA temp + output | peak in use (MB) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for shape in shapes.split(","):
        family, size, batch, seq_len = shape.split(":")
        r = planner_vs_xla(family, size, int(batch), int(seq_len))
        planner = r["planner_params"] + r["planner_activations"]
        xla = r["xla_arguments"] + r["xla_temp"] + r["xla_output"]
        peak = "-" if r["peak"] is None else f"{r['peak'] / 1e6:.0f}"
        print(f"| {family} | {size} | {batch} x {seq_len} | {r['planner_params'] / 1e6:.0f} + "
              f"{r['planner_activations'] / 1e6:.0f} | {r['xla_arguments'] / 1e6:.0f} + {r['xla_temp'] / 1e6:.0f} + "
              f"{r['xla_output'] / 1e6:.1f} | {planner / xla:.2f} | "
              f"{r['planner_activations'] / (r['xla_temp'] + r['xla_output']):.2f} | {peak} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--n", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--platform", default="cpu", choices=["cpu", "gpu", "tpu"],
                        help="cpu: P fake devices per row; gpu: the first P GPUs; tpu: the host's chips")
    parser.add_argument("--size", default="tiny", help="the random ESM-2's size (tiny, 8M, 35M, 150M, 650M, 3B, 15B)")
    parser.add_argument("--lengths", default="8,28", help="LO,HI residues of the random proteins")
    parser.add_argument("--memory", action="store_true", help="the memory planner against XLA, no timing")
    parser.add_argument("--shapes", default=MEMORY_SHAPES, help="--memory: family:size:batch:seq_len,...")
    args = parser.parse_args()
    if args.memory:
        memory_table(args.shapes)
        return
    counts = [int(d) for d in args.devices.split(",")]
    rows = []
    run = functools.partial(run_one, n=args.n, batch_size=args.batch_size, repeats=args.repeats,
                            platform=args.platform, size=args.size, lengths=args.lengths)
    with tempfile.TemporaryDirectory() as scratch:
        plain = run(1, "never", scratch=pathlib.Path(scratch))  # the single-device path: one device of any host
        rows.append(("1 (plain)", plain))
        for devices in counts:
            rows.append((str(devices), run(devices, "always", scratch=pathlib.Path(scratch))))
    plain_rate = plain["examples"] / plain["seconds"]
    lo, hi = args.lengths.split(",")
    print(f"random ESM-2 {args.size} on {args.platform}, {args.n} proteins ({lo}-{hi} residues), global batch "
          f"{args.batch_size}, best of {args.repeats}\n")
    print("| devices | seconds | examples/s | vs plain |")
    print("|---|---:|---:|---:|")
    for name, t in rows:
        rate = t["examples"] / t["seconds"]
        print(f"| {name} | {t['seconds']:.2f} | {rate:.1f} | {rate / plain_rate:.2f} |")
    sharded_one = next((t for name, t in rows if name == "1"), None)
    if sharded_one is not None:  # --devices without 1 has no single-device sharded row
        print(f"\noverhead of the sharded path on 1 device: {sharded_one['seconds'] / plain['seconds'] - 1:+.1%}")


if __name__ == "__main__":
    main()
