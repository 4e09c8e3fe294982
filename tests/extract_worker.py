"""Runs `experiments.extract.run` in a fresh process with several (fake CPU) devices; used by
tests/test_distributed_extract.py and benchmarks/extraction_bench.py.

The device count is fixed when jax starts, so the caller sets
XLA_FLAGS=--xla_force_host_platform_device_count=<devices> in this process's environment.

    python tests/extract_worker.py --family esm2 --workdir W [--batch-size 6] [--sharding always]
        [--model-parallel 2] [--coordinator 127.0.0.1:PORT --num-processes 2 --process-id I]
        [--kill-after K | --raise-after K | --raise-at-start] [--record written.json]
        [--timing timing.json --repeats R]

One process of a multi-process job joins through `experiments.distributed.initialize` (as launch.py's
flags do). --record: the files this process renamed into place under the workdir (every atomic write
ends in `os.replace`), as JSON. Failure injection (tests only): --kill-after K: SIGKILL this process right
after it stored K batches; --raise-after K: raise a RuntimeError there instead; --raise-at-start: raise one
before the extraction's first collective (uncaught, as a bug would be: `distributed`'s handler takes it).
--timing: examples/s of the extraction (the model built and compiled before the clock starts; the best of
--repeats fresh extractions).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import sys
import time

import numpy as np

N_PROTEINS = 24
LENGTHS = (8, 28)  # residues per random protein, inclusive; --lengths sets them (benchmarks on real devices)


def proteins(cfg) -> object:
    """A seeded random protein set (lengths `LENGTHS`, by default 8..28: two padded widths, two compilations; three
    labels): the data source of the ESM-2 runs."""
    from experiments.datasets import Examples

    rng = np.random.default_rng(7)
    alphabet = np.array(list("LAGVSERTIDPKQNFYMHWC"))
    n = int(cfg.get("max_examples") or N_PROTEINS)
    seqs = tuple("".join(rng.choice(alphabet, int(rng.integers(LENGTHS[0], LENGTHS[1] + 1)))) for _ in range(n))
    return Examples(seqs, labels=np.arange(n) % 3, ids=tuple(f"p{i}" for i in range(n)),
                    label_names=("a", "b", "c"), description={"source": "random proteins"})


def config_for(family: str, batch_size: int | str, sharding: str, model_parallel: int, n: int | None = None,
               size: str = "tiny"):
    from configs import base

    config = base.analysis_config()
    config.model.source, config.model.size, config.model.seed = "random", size, 0
    if family == "esm2":
        config.model.family = "esm2"
        config.data.source = "tests.extract_worker:proteins"
        config.data.max_examples = n or N_PROTEINS
    else:
        config.model.family = "igpt"
        config.model.overrides = {"vocab_size": 17, "n_positions": 64}
        config.data.name = "digits"
        config.data.max_examples = n or 60
    config.extract.batch_size = batch_size
    config.extract.sharding = sharding
    config.extract.model_parallel = model_parallel
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", choices=["esm2", "igpt"], default="esm2")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--batch-size", default="6")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--sharding", default="always")
    parser.add_argument("--model-parallel", type=int, default=0)
    parser.add_argument("--coordinator", default=None)
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--kill-after", type=int, default=0)
    parser.add_argument("--raise-after", type=int, default=0)
    parser.add_argument("--raise-at-start", action="store_true")
    parser.add_argument("--record", default=None)
    parser.add_argument("--timing", default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--size", default="tiny", help="the random model's size (esm2: tiny, 8M, 35M, 150M, 650M, ...)")
    parser.add_argument("--lengths", default=None, help="LO,HI residues of the random proteins (default 8,28)")
    parser.add_argument("--expect-devices", type=int, default=0,
                        help="refuse to run unless jax sees exactly this many devices (real accelerators)")
    args = parser.parse_args(argv)

    from experiments import distributed, extract, store

    top = distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if args.expect_devices and top.device_count != args.expect_devices:
        raise SystemExit(f"jax sees {top.device_count} {top.platform} device(s), {args.expect_devices} were asked for: "
                         "on a TPU host every row uses all its chips (pass --devices <that count>)")
    if args.lengths:
        import tests.extract_worker as source  # the module data.source imports, not this __main__

        source.LENGTHS = tuple(int(v) for v in args.lengths.split(","))
    workdir = pathlib.Path(args.workdir).absolute()
    written: list[str] = []
    real_replace = os.replace

    def recording_replace(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        if pathlib.Path(dst).absolute().is_relative_to(workdir):
            written.append(str(pathlib.Path(dst).absolute().relative_to(workdir)))

    os.replace = recording_replace
    if args.kill_after or args.raise_after:
        real_write, stored = store.write_batch, []

        def write_then_fail(*a, **k):
            real_write(*a, **k)
            stored.append(1)
            if len(stored) == args.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if len(stored) == args.raise_after:
                raise RuntimeError(f"injected failure in process {top.process_index} after storing {len(stored)} "
                                   "batch(es)")

        store.write_batch = write_then_fail
    if args.raise_at_start:
        raise RuntimeError(f"injected failure in process {top.process_index} before the first collective")
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    config = config_for(args.family, batch_size, args.sharding, args.model_parallel, args.n, args.size)
    timing = {}
    if args.timing:  # build and compile first (one throwaway workdir), so the clock sees extraction only
        extract.run(config, workdir.with_name(workdir.name + "_warmup"))
        distributed.barrier("worker: warm")
    seconds = []
    for repeat in range(args.repeats):  # the best of fresh extractions (the first into the workdir itself)
        start = time.perf_counter()
        manifest = extract.run(config, workdir if repeat == 0 else workdir.with_name(f"{workdir.name}_{repeat}"))
        seconds.append(time.perf_counter() - start)
    timing = {"seconds": min(seconds), "examples": manifest["n_examples"],
              "device_count": top.device_count, "process_count": top.process_count}
    if args.timing and distributed.is_writer():
        pathlib.Path(args.timing).write_text(json.dumps(timing))
    if args.record:
        pathlib.Path(args.record).write_text(json.dumps({"process": top.process_index, "written": sorted(written),
                                                         "topology": top._asdict()}))
    if top.process_count > 1:
        import jax

        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
