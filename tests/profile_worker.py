"""One process of a multi-process profile (tests/test_profile_processes.py): joins the job with
`jax.distributed.initialize` on localhost, then runs the profile stage once per (mode, workdir) pair.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/profile_worker.py \
        --runs layers=WORKDIR_A,ring=WORKDIR_B --process-id 0 --num-processes 2 --port 12345
"""

from __future__ import annotations

import argparse
import pathlib


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=60)
    from experiments import profile
    from tests.test_profile_processes import profile_config

    for run in args.runs.split(","):
        mode, workdir = run.split("=", 1)
        results = profile.run(profile_config(mode), pathlib.Path(workdir))
        assert results["process_mode"] == mode, (results["process_mode"], mode)


if __name__ == "__main__":
    main()
