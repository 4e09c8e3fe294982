"""How exact kNN time and memory grow with N, and with the number of devices (idjax.knn, idjax.sharded).

    .venv/bin/python benchmarks/scaling_bench.py [--d 128] [--k 64] [--sizes 2000,5000,10000,20000,40000,80000]
                                                 [--devices 1,2,4,8] [--device-n 20000] [--repeats 1]

Table 1: single-device `idjax.knn` for each N. Table 2: `idjax.sharded.knn_sharded` at a fixed N on
1, 2, 4, 8 fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=P). Every cell runs in
its own subprocess so its peak RSS (resource.getrusage ru_maxrss) is its own; "RSS growth" is the
peak minus the RSS just before the kNN call (jax started, data made). Times are the best of
`--repeats` after one warm-up call that also compiles. GFLOP/s counts the 2 N^2 D flops of the
distance GEMM. Data: float32 Gaussian with a low-rank structure, like pooled representations.
The index arrays of table 2 are compared with idjax.knn at the same N (by digest).

Fake CPU devices all share this machine's cores, so table 2 shows the overhead and the memory per
device of the sharded ring, not a speed-up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _data(n: int, dim: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    rank = min(dim, 32)
    x = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, dim)) + 0.1 * rng.normal(size=(n, dim))
    return x.astype(np.float32)


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> None:
    import jax
    import numpy as np

    import idjax
    from idjax import neighbors, sharded

    x = _data(args.n, args.d)
    before = _current_rss_bytes()
    formula = neighbors.plan_knn(args.n, args.d, args.k, devices=jax.device_count()).bytes_per_device
    if args.mode == "single":
        run = lambda: idjax.knn(x, args.k)
    else:
        run = lambda: sharded.knn_sharded(x, args.k)
    t0 = time.perf_counter()
    out = run()
    jax.block_until_ready(out)
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = run()
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - t0)
    peak = _rss_bytes()
    indices = np.ascontiguousarray(np.asarray(out.indices))
    print(json.dumps({
        "devices": jax.device_count(), "first": first, "best": best, "formula": formula,
        "rss_peak": peak, "rss_growth": peak - before, "digest": hashlib.sha1(indices.tobytes()).hexdigest(),
    }))


def launch(mode: str, n: int, args, devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    cmd = [sys.executable, __file__, "--child", mode, "--n", str(n), "--d", str(args.d), "--k", str(args.k),
           "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} N={n} P={devices} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mib(value: float) -> str:
    return f"{value / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--sizes", default="2000,5000,10000,20000,40000,80000")
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--device-n", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--child", choices=["single", "sharded"])
    parser.add_argument("--n", type=int)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        child(args)
        return

    import jax

    sizes = [int(v) for v in args.sizes.split(",")]
    device_counts = [int(v) for v in args.devices.split(",")]
    print(f"# kNN scaling: D = {args.d}, k = {args.k}, float32, jax {jax.__version__}, {os.cpu_count()} CPU cores; "
          f"best of {args.repeats} after a warm-up\n")
    print("## idjax.knn, one device\n")
    print("| N | time (s) | first call incl. compile (s) | GFLOP/s | working set, formula (MiB) "
          "| peak RSS (MiB) | RSS growth (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    digests = {}
    for n in sizes:
        r = launch("single", n, args)
        digests[n] = r["digest"]
        gflops = 2 * n * n * args.d / r["best"] / 1e9
        print(f"| {n:,} | {r['best']:.2f} | {r['first']:.2f} | {gflops:.0f} | {mib(r['formula'])} "
              f"| {mib(r['rss_peak'])} | {mib(r['rss_growth'])} |", flush=True)
    n = args.device_n
    if n not in digests:
        digests[n] = launch("single", n, args)["digest"]
    print(f"\n## idjax.sharded.knn_sharded, N = {n:,}, on P fake CPU devices\n")
    print(f"Fake CPU devices share the same {os.cpu_count()} cores: this shows the ring's overhead and the "
          "memory per device, not a speed-up.\n")
    print("| devices P | rows per device | time (s) | first call incl. compile (s) | GFLOP/s "
          "| per-device working set, formula (MiB) | peak RSS, all devices (MiB) | RSS growth (MiB) "
          "| indices = idjax.knn |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for p in device_counts:
        r = launch("sharded", n, args, devices=p)
        gflops = 2 * n * n * args.d / r["best"] / 1e9
        same = "yes" if r["digest"] == digests[n] else "NO"
        print(f"| {p} | {-(-n // p):,} | {r['best']:.2f} | {r['first']:.2f} | {gflops:.0f} | {mib(r['formula'])} "
              f"| {mib(r['rss_peak'])} | {mib(r['rss_growth'])} | {same} |", flush=True)


if __name__ == "__main__":
    main()
