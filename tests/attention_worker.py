"""One process of a 2-process job that makes the "auto" attention choice while a jitted function is traced;
used by tests/test_attention.py.

    python tests/attention_worker.py --port P --process-id I --cache-dir D --out result.json

Each process has its own (empty) choice cache and a fake measurement that prefers a different implementation
on each process (einsum on process 0, xla elsewhere), so the processes agree only if they take process 0's
choice. The output records the choice, whether this process measured, and the jitted attention's result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ["IDJAX_CACHE_DIR"] = args.cache_dir

    import jax
    import numpy as np

    from experiments import distributed
    from models import attention

    distributed.initialize(f"localhost:{args.port}", 2, args.process_id)
    measured = []

    def fake_measure(shape, dtype, names):
        measured.append(list(shape))
        preferred = "einsum" if jax.process_index() == 0 else "xla"
        return {name: (0.001 if name == preferred else 0.002) for name in names}

    shape = (8, 64, 16, 16)  # 8.4M multiply-adds: above the size that is measured
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=shape).astype(np.float32) for _ in range(3))
    key_mask = np.ones(shape[:2], bool)

    chosen = []

    def traced(q, k, v, key_mask):  # the choice is made here, during tracing, as the models make it
        chosen.append(attention.choose(q.shape, q.dtype, measure=fake_measure))
        return attention.attend(q, k, v, key_mask, implementation=chosen[-1])

    out = jax.jit(traced)(q, k, v, key_mask)
    with open(args.out, "w") as f:
        json.dump({"process": jax.process_index(), "choice": chosen[0], "measured": measured,
                   "sum": float(np.asarray(out).sum())}, f)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
