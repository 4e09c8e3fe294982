"""Extraction throughput of a small ESM-2 on 1, 2, 4, 8 devices, and the cost of the sharded path on one device.

    .venv/bin/python benchmarks/extraction_bench.py [--devices 1,2,4,8] [--n 384] [--batch-size 32] [--repeats 3]

Every row runs `experiments.extract.run` in its own subprocess (tests/extract_worker.py; the fake CPU device
count, XLA_FLAGS=--xla_force_host_platform_device_count=P, is fixed when jax starts): the tiny random ESM-2
(2 layers, width 64) on `--n` seeded random proteins, global batch `--batch-size` sharded over "data".
Each subprocess first extracts the same data into a throwaway workdir (model built, every padded width
compiled), then times `--repeats` fresh extractions and keeps the best: examples/s of the stored result,
batch files, layer files and manifest included. Row "1 (plain)" is the single-device path without the mesh
(`extract.sharding=never`); "overhead" compares the sharded path on 1 device with it (target: within 10%).

Fake CPU devices share this machine's cores, so the rows show the cost of the sharded path, not a
speed-up; on a GPU/TPU host each device computes its own share of the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "extract_worker.py"


def run_one(devices: int, sharding: str, n: int, batch_size: int, repeats: int, scratch: pathlib.Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    tag = f"d{devices}_{sharding}"
    timing = scratch / f"{tag}.json"
    proc = subprocess.run([sys.executable, str(WORKER), "--family", "esm2", "--workdir", str(scratch / tag),
                           "--n", str(n), "--batch-size", str(batch_size), "--sharding", sharding,
                           "--timing", str(timing), "--repeats", str(repeats)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"{tag} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(timing.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--n", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    counts = [int(d) for d in args.devices.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        plain = run_one(1, "never", args.n, args.batch_size, args.repeats, pathlib.Path(scratch))
        rows.append(("1 (plain)", plain))
        for devices in counts:
            rows.append((str(devices), run_one(devices, "always", args.n, args.batch_size, args.repeats,
                                                 pathlib.Path(scratch))))
    plain_rate = plain["examples"] / plain["seconds"]
    print(f"tiny ESM-2, {args.n} proteins (8-28 residues), global batch {args.batch_size}, best of {args.repeats}\n")
    print("| devices | seconds | examples/s | vs plain |")
    print("|---|---:|---:|---:|")
    for name, t in rows:
        rate = t["examples"] / t["seconds"]
        print(f"| {name} | {t['seconds']:.2f} | {rate:.1f} | {rate / plain_rate:.2f} |")
    sharded_one = next(t for name, t in rows if name == "1")
    print(f"\noverhead of the sharded path on 1 device: {sharded_one['seconds'] / plain['seconds'] - 1:+.1%}")


if __name__ == "__main__":
    main()
